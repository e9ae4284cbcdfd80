"""pyrqlite (rqlite's Python DB-API client, unchanged from PyPI) against a
scaleout db node: usage: pyrqlite_check.py HOST PORT. Prints OK or fails."""
import sys

import pyrqlite.dbapi2 as dbapi2

host, port = sys.argv[1], int(sys.argv[2])
conn = dbapi2.connect(host=host, port=port)
cur = conn.cursor()
cur.execute("CREATE TABLE people (id INTEGER NOT NULL PRIMARY KEY, name TEXT, score REAL)")
cur.executemany("INSERT INTO people(name, score) VALUES(?, ?)", [("ada", 1.5), ("grace", 2.0)])
cur.execute("INSERT INTO people(name, score) VALUES(:name, :score)", {"name": "linus", "score": 3.25})
assert cur.lastrowid == 3, cur.lastrowid
cur.execute("SELECT id, name, score FROM people WHERE name = ?", ("grace",))
row = cur.fetchone()
assert row["id"] == 2 and row["name"] == "grace" and row["score"] == 2.0, row
cur.execute("SELECT name FROM people ORDER BY id", consistency="strong")
assert [r[0] for r in cur.fetchall()] == ["ada", "grace", "linus"]
cur.execute("UPDATE people SET score = score * 2 WHERE name = 'ada'")
assert cur.rowcount == 1, cur.rowcount
cur.execute("SELECT count(*) AS n FROM people", consistency="none")
assert cur.fetchone()["n"] == 3
try:
    cur.execute("INSERT INTO missing VALUES (1)")
except dbapi2.Error as e:
    assert "no such table" in str(e), e
else:
    raise AssertionError("an SQL error must raise")
conn.close()
print("OK")
