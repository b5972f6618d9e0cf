import sys

from glmimage.cli import main

sys.exit(main())
