"""`python -m walrus` runs the command line."""
from walrus.cli import main

main()
