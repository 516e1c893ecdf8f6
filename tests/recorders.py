"""Recorders of the ops a piece of code runs (torch dispatch modes), for the tests of precision and memory."""
import re

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PRODUCT = re.compile("mm|matmul|linear")  # mm, bmm, addmm, baddbmm, matmul, linear; in-place and out= too


def tensor_arguments(args, kwargs):
    return [arg for arg in [*args, *kwargs.values()] if isinstance(arg, torch.Tensor)]


class VocabularyProducts(TorchDispatchMode):
    """Records ``(op, operand dtypes)`` of every matrix product, ``out=`` tensor included, one of whose operands
    has a vocabulary-sized dimension."""

    def __init__(self, vocabulary):
        super().__init__()
        self.vocabulary, self.products = vocabulary, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if PRODUCT.search(func.overloadpacket.__name__):
            tensors = tensor_arguments(args, kwargs)
            if any(self.vocabulary in tensor.shape for tensor in tensors):
                self.products.append((str(func), {tensor.dtype for tensor in tensors}))
        return func(*args, **kwargs)

    def dtypes(self):
        """The set of operand dtypes of all recorded products."""
        return set().union(*(dtypes for _, dtypes in self.products))


class NewTensors(TorchDispatchMode):
    """Records the shape of every tensor an op returns that shares no storage with its arguments: what it
    allocates (views and in-place results are not)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        storages = {tensor.untyped_storage().data_ptr() for tensor in tensor_arguments(args, kwargs)}
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in storages:
                self.shapes.append(tuple(tensor.shape))
        return result
