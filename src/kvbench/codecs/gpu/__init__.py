"""Hand-written CUDA kernels of the codecs (CuPy only), one module per kernel family.

``turboquant_proto``: quantise + pack around the prototype's GEMM rotation; ``turboquant_llama``:
the llama.cpp format fully fused (WHT in registers); ``kakeyaturbo``: block Gram, d_eff, the
whole-block K-means + residual encode and the decode; ``kakeya_kv1``: the KV1 K-means loop, codes
and decoder rows. The Jacobi eigh kernel lives with the other batched linear algebra in
:mod:`kvbench.codecs.linalg`. Kernels compile once through :func:`compile.compiled`.
"""
