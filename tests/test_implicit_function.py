"""Fitted implicit networks as stored functions (featup_ops.implicit_function): the flat vector's layout, rebuilding
and rendering it (equal to the fit's own result), any size, folding a PCA basis, one-line errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from featup_ops.errors import InputSizeError
from featup_ops.implicit_fit import fit_implicit, fit_implicit_functions
from featup_ops.implicit_function import ImplicitFunctions, function_layout
from featup_ops.pca import PCABasis, apply_pca

from test_implicit import TINY, TinyBackbone, _images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = dataclasses.replace(TINY, steps=3)


@pytest.fixture(scope="module")
def fitted():
    bb, imgs = TinyBackbone(), _images(n=3)
    info: dict = {}
    fns = fit_implicit_functions(imgs, bb, cfg=CFG, seed=5, info=info)
    return bb, imgs, fns, info


def test_layout_length_follows_from_the_config(fitted):
    _, _, fns, info = fitted
    lay = fns.layout
    n, c_in, hid = CFG.n_freqs, CFG.in_channels, CFG.hidden_dim
    k, c = CFG.proj_dim, TinyBackbone.dim
    net = 2 * 5 * n + 2 * c_in + hid * c_in + hid + 2 * hid + hid * hid + hid + k * hid + k
    assert lay.size == net + k * c + c and fns.params.shape == (3, lay.size) and fns.params.dtype == torch.float32
    assert (lay.k, lay.channels) == (k, c) and info["proj_dim"] == k and len(info["steps"]) == 3
    assert function_layout(CFG, k, c) == lay  # only the config, k and C decide it


def test_rendering_the_functions_is_the_fit_at_any_size(fitted):
    bb, imgs, fns, _ = fitted
    want = fit_implicit(imgs, bb, cfg=CFG, seed=5, output_size=(20, 28))  # same seed: the same networks
    torch.testing.assert_close(fns.render(imgs, (20, 28)), want, rtol=0, atol=0)  # the same readout, bit for bit
    one = ImplicitFunctions(fns.params[1:2], fns.layout).render(imgs[1:2], (20, 28))  # a row alone
    torch.testing.assert_close(one, want[1:2], rtol=1e-5, atol=1e-5)
    big = fns.render(imgs, (45, 17), group_size=1)
    assert big.shape == (3, TinyBackbone.dim, 45, 17) and torch.isfinite(big).all()


def test_project_folds_a_pca_basis(fitted):
    _, imgs, fns, _ = fitted
    g = torch.Generator().manual_seed(0)
    comps = torch.linalg.qr(torch.randn(TinyBackbone.dim, 4, generator=g))[0].T.contiguous()  # (4, C) orthonormal
    basis = PCABasis(mean=torch.randn(TinyBackbone.dim, generator=g).numpy(), components=comps.numpy(),
                     explained=torch.zeros(4).numpy())
    folded = fns.project(torch.as_tensor(basis.mean), comps)
    assert folded.layout.channels == 4 and folded.params.shape[1] < fns.params.shape[1]
    want = apply_pca(fns.render(imgs, (16, 20)), basis)
    torch.testing.assert_close(folded.render(imgs, (16, 20)), want, rtol=1e-5, atol=1e-5)


def test_wrong_vectors_are_refused_in_one_line(fitted):
    _, imgs, fns, _ = fitted
    with pytest.raises(InputSizeError, match=r"params must be \(N, \d+\)") as e:
        ImplicitFunctions(fns.params[:, :-1], fns.layout)
    assert "\n" not in str(e.value)
    with pytest.raises(InputSizeError, match="one per function"):
        fns.render(imgs[:2], (8, 8))
    with pytest.raises(InputSizeError, match="basis over"):
        fns.project(torch.zeros(5), torch.zeros(2, 5))
