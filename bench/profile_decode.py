"""One generation-phase launch per KV dtype at the bench shape, for Nsight Compute:
    ncu -k regex:paged_decode --section SpeedOfLight --section WarpStateStats python bench/profile_decode.py
"""
import sys

import torch

import bench_paged_attention as bp  # bench/ is sys.path[0] when this script runs
from trtc.plugins import kernels

for kv in sys.argv[1:] or ["auto", "fp8_e4m3"]:
    case = bp.decode_case(64, 4096, 32, 8, 128, 16, kv)
    q_rot = kernels.rope_kv_append(*case.append_args, **case.append_attrs)
    kernels.paged_attention(*case.attention_args(q_rot), max_q_len=1, max_seq_len=4096, **case.attrs)
    torch.cuda.synchronize()
    del case
