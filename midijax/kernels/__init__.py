"""Hand-written kernels for backends where XLA's own lowering is the bottleneck.

`causal_attention`: C++ XLA FFI custom calls for one CPU device: the training step's causal
attention (forward and backward) and the sampler's decode-step attention over the cache.
"""
