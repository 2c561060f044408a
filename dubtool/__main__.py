from dubtool.cli import run

run()
