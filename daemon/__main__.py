import sys

from shmserve.daemon.cli import main

sys.exit(main())
