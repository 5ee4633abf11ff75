from supervisord.cli import main

raise SystemExit(main())
