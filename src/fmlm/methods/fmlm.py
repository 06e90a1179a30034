"""The flow map LM; moved to :mod:`fmlm.methods.flow_map` (this name stays for imports written before)."""

from fmlm.methods.flow_map import FMLM, OBJECTIVES, flow_map, kl_capped, kl_rows, softmax_, sparsemax

__all__ = ["FMLM", "OBJECTIVES", "flow_map", "kl_capped", "kl_rows", "softmax_", "sparsemax"]
