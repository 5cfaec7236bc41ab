import sys

from dynamo_lite.planner.cli import main

sys.exit(main())
