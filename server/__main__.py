from cifar10_serving.server.main import main

raise SystemExit(main())
