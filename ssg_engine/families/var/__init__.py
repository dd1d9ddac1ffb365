"""The VAR family (class-conditional, upstream FoundationVision/VAR): ``config`` (ModelConfig, presets),
``model`` (VARTransformer), ``tokenizer`` (the multi-scale VQ-VAE), ``sampler`` (the upstream-exact reference sampler,
``VAR.autoregressive_infer_cfg``), ``loading`` (``load_models``), ``spec`` (its registry entry)."""
