"""Benchmarks, each a ratio of two things measured side by side in one run (these machines are noisy).

``python -m qkrank.bench [--quick] [--out results/bench] [--gpu-only --preset 1.5b]`` writes JSON files
under ``--out`` and prints a Markdown table. docs/benchmarks.md explains every measurement. One module per
kind of benchmark:

- ``core``: model FLOPs per token (PaLM appendix B: 6·N + 12·n_layers·d_model·seq_len, N = weights of every
  Linear layer), measured square-matmul peaks per dtype, the goals.
- ``steps``: a train step as qkrank.train takes it, timed; the naive-attention copy of the model.
- ``cpu``: tokens/s of the ``tiny`` train step in fp32 and, on CPUs with native bf16, bf16 autocast; MFU
  against the peak of the dtype training uses and against the fp32 peak; speed-up over naive attention.
- ``probe_cost``: probe time ÷ training time of one checkpoint interval; peak RSS of a probe as its tokens
  double; what a probe job (``python -m qkrank.probe``) pays before it works.
- ``workflow``: ``snakemake -n`` wall time of a 2 scales × 3 modes × 5 seeds × 26 checkpoints study.
- ``gpu`` (CUDA only): step time, tokens/s and MFU against the GPU's dense bf16 peak for ``88m`` and ``1.5b``.
- ``cli``: the machine block, the Markdown table, the command line.
"""


def main(argv=None) -> None:
    """``qkrank bench`` (imported on call, so ``import qkrank.bench`` stays cheap)."""
    from qkrank.bench.cli import main as cli_main

    return cli_main(argv)
