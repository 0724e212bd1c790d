import sys

from tapflow_cli.main import main

sys.exit(main())
