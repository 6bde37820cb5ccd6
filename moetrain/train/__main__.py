from moetrain.train.cli import main

main()
