import sys

from dicomvault.cli.main import main

sys.exit(main())
