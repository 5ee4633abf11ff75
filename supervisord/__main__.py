from supervisord.cli.main import main

raise SystemExit(main())
