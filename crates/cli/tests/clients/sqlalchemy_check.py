"""SQLAlchemy's ORM through sqlalchemy-rqlite (the rqlite dialect, over
pyrqlite; both unchanged from PyPI) against a scaleout db node: usage:
sqlalchemy_check.py HOST PORT. Prints OK or fails.

What it leans on: DDL from the ORM's metadata, rowcount and lastrowid,
datetimes read back through pyrqlite's converters (rqlite's RFC 3339),
booleans, NULLs, a unique constraint's error, and a transaction rolled
back by the ORM's session. (`sa.Date` columns are left out: pyrqlite
turns rqlite's DATE values into `datetime.date` objects where this
dialect's default processors expect text, against rqlite as here.)"""
import datetime
import sys

import sqlalchemy as sa
from sqlalchemy import orm

host, port = sys.argv[1], int(sys.argv[2])
engine = sa.create_engine(f"rqlite+pyrqlite://{host}:{port}/")


class Base(orm.DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "person"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str] = orm.mapped_column(sa.String(40), unique=True)
    seen: orm.Mapped[datetime.datetime] = orm.mapped_column(sa.DateTime)
    active: orm.Mapped[bool] = orm.mapped_column(sa.Boolean)
    note: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)


Base.metadata.create_all(engine)
assert sa.inspect(engine).has_table("person")

seen = datetime.datetime(2004, 2, 14, 7, 15, 0)
later = datetime.datetime(2026, 12, 5, 9, 30, 1, 250000)
with orm.Session(engine) as session:
    session.add_all(
        [
            Person(name="ada", seen=seen, active=True),
            Person(name="grace", seen=later, active=False, note="navy"),
        ]
    )
    session.commit()

with orm.Session(engine) as session:
    people = session.scalars(sa.select(Person).order_by(Person.id)).all()
    assert [p.name for p in people] == ["ada", "grace"], people
    ada, grace = people
    assert ada.seen == seen, repr(ada.seen)
    assert grace.seen == later, repr(grace.seen)
    assert ada.active is True and grace.active is False, (ada.active, grace.active)
    assert ada.note is None and grace.note == "navy"
    count = session.scalar(sa.select(sa.func.count()).select_from(Person))
    assert count == 2, count

    ada.note = "engine"
    session.commit()
    result = session.execute(sa.update(Person).where(Person.active.is_(False)).values(note="admiral"))
    assert result.rowcount == 1, result.rowcount
    session.commit()

    session.add(Person(name="ada", seen=seen, active=True))
    try:
        session.commit()
    except sa.exc.DBAPIError as e:  # pyrqlite raises its generic Error
        assert "UNIQUE" in str(e), e
        session.rollback()
    else:
        raise AssertionError("a duplicate name must fail")

with engine.connect() as conn:
    rows = conn.execute(sa.text("SELECT name, note FROM person ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [("ada", "engine"), ("grace", "admiral")], rows

Base.metadata.drop_all(engine)
assert not sa.inspect(engine).has_table("person")
print("OK")
