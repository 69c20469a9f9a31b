from makd.cli import main

raise SystemExit(main())
