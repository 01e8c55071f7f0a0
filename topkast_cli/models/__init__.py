"""Models: each config in conf/model/ names a constructor with `_target_`; the trainer passes
`num_classes` and `input_shape` (per-sample, e.g. (3, 32, 32)) from the dataset."""
