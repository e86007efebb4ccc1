"""cleanup: drop nodes and graph inputs that no output depends on, then sort topologically.

After the KV and mask passes, HF's mask subgraph and the `attention_mask` input are dead.
"""

from __future__ import annotations

from . import PassContext, register_pass


@register_pass("cleanup")
def cleanup(graph, ctx: PassContext):
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=True).toposort()
    ctx.stats["cleanup"] = before - len(graph.nodes)
    return graph
