"""The Infinity family (text-conditional, upstream FoundationVision/Infinity): ``model`` (InfinityTransformer,
InfinityConfig and presets, scale schedules, TextFeatures, InfinityRequest), ``tokenizer`` (the BSQ VAE), ``text`` (the small
word-level encoder, Flan-T5 features), ``sampler`` (the upstream-exact reference sampler), ``loading``
(``load_infinity``), ``spec`` (its registry entry)."""
