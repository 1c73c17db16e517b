from caq_lightning.export.cli import main

main()
