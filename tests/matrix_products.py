"""A recorder of the matrix products that involve the vocabulary dimension, for the precision tests."""
import re

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PRODUCT = re.compile("mm|matmul|linear")  # mm, bmm, addmm, baddbmm, matmul, linear; in-place and out= too


class VocabularyProducts(TorchDispatchMode):
    """Records ``(op, operand dtypes)`` of every matrix product, ``out=`` tensor included, one of whose operands
    has a vocabulary-sized dimension."""

    def __init__(self, vocabulary):
        super().__init__()
        self.vocabulary, self.products = vocabulary, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if PRODUCT.search(func.overloadpacket.__name__):
            tensors = [arg for arg in [*args, *kwargs.values()] if isinstance(arg, torch.Tensor)]
            if any(self.vocabulary in tensor.shape for tensor in tensors):
                self.products.append((str(func), {tensor.dtype for tensor in tensors}))
        return func(*args, **kwargs)

    def dtypes(self):
        """The set of operand dtypes of all recorded products."""
        return set().union(*(dtypes for _, dtypes in self.products))
