"""``python -m edgeq``: the ``edgeq`` command line (also what ``torchrun -m edgeq distill ...`` runs)."""

from edgeq.cli import main

if __name__ == "__main__":
    main()
