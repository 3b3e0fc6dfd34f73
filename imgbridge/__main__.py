from imgbridge._entry import main

raise SystemExit(main())
