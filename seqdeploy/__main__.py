"""``python -m seqdeploy``: the same as the ``seqdeploy`` command."""
from seqdeploy.cli import main

main()
