from ferry.cli import app

app(prog_name="ferry")
