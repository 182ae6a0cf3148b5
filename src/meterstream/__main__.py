import sys

from meterstream.pipeline.cli import main

sys.exit(main())
