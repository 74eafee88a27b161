"""Dataset-scale attribution (``cca attribute``): every q / k / v head, MLP neuron, attention
output and MLP output scored over a data set, streamed, resumable, on one process or under
``torchrun``.

* :mod:`.inputs`: reading (JSONL, ``cca run`` pivots, tables), checks, tokenizing, batching;
* :mod:`.methods`: metrics, positions, the layout, gradient x activation / attribution patching /
  mean ablation / integrated gradients reduced inside backward (:class:`~.methods.Scorer`);
* :mod:`.store`: chunk files, ``scores.safetensors``, ranked tables; :mod:`.plots`: heat maps;
* :mod:`cca_fast.distributed`: ranks, chunk ownership, all-reduce (shared with ``cca run``);
* :mod:`.run`: :func:`attribute_dataset`.
"""
from .inputs import Example
from .methods import ALL_KINDS, BLOCK_KINDS, Layout, Scorer
from .run import AttributeConfig, DatasetAttribution, attribute_dataset

__all__ = ["attribute_dataset", "AttributeConfig", "DatasetAttribution", "Example", "Layout", "Scorer",
           "ALL_KINDS", "BLOCK_KINDS"]
