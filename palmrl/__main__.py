"""`python -m palmrl` (and `torchrun -m palmrl`, `deepspeed -m palmrl`) run the CLI."""

from palmrl.cli import main

main()
