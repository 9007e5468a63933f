from speech2face.cli import run

run()
