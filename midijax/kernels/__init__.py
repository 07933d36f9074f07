"""Hand-written kernels for backends where XLA's own lowering is the bottleneck.

`causal_attention`: the training-step attention on XLA:CPU as a C++ FFI custom call.
"""
