import sys

from fiddlerc.cli import main

sys.exit(main())
