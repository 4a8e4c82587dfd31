from cifar10_serving.client.cli import main

raise SystemExit(main())
