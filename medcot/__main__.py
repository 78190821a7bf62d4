import sys

from medcot.cli import main

sys.exit(main())
