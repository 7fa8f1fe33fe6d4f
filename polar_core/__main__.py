import sys

from polar_core.cli import main

sys.exit(main())
