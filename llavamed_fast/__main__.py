import sys

from llavamed_fast.cli import main

sys.exit(main())
