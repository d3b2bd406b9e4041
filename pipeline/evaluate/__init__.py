"""Using the features: labels for dense tasks (:mod:`.labels`), linear probes (:mod:`.probe`) and pictures of
features (:mod:`.visualize`)."""
