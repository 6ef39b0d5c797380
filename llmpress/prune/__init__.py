"""Pruning: unstructured and N:M masks (magnitude, Wanda, SparseGPT) as pure solvers on
tensors, and structured shrinking of whole decoder blocks."""
