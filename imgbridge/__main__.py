from imgbridge.cli import main

raise SystemExit(main())
