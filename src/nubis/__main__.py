"""``python -m nubis`` runs the ``nubis`` command."""

from nubis.cli import main

raise SystemExit(main())
