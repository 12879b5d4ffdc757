from wsrelay.cli import main

raise SystemExit(main())
