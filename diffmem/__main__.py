"""`python -m diffmem`: what diffmem is and its commands (`--version` prints the version)."""
import sys

from diffmem.cli import ArgumentParser

COMMANDS = """\
commands (each also runs as python sweeps/<name>.py or python -m diffmem.<name>; --help shows its examples):
  emm-search        find the EMM of every value of one factor, with Ray Tune (sweeps/emm_search.py)
  diffmem-study     the paper's findings: many factor sweeps sharing one ledger, and a findings page
  diffmem-report    one HTML page for one sweep or several
  diffmem-explore   an Optuna study of several factors at once, at one |D|
  diffmem-train     train one EDM model and print its memorization ratio (python -m diffmem.train)
  diffmem-optimum   sample the empirical optimal denoiser (python -m diffmem.optimum)
  diffmem-data      load and summarize the training subset a config describes (python -m diffmem.data)"""


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m diffmem", description="diffmem: effective model memorization (EMM) of "
                            "diffusion models, measured by Ray Tune sweeps (Gu et al., TMLR 2025).\n\n" + COMMANDS)
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
