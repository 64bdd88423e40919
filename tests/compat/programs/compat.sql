-- What an application does with sqlite: a WAL database in /tmp, transactions, an index,
-- JSON, full-text search, a recursive CTE, a dump.
PRAGMA journal_mode = WAL;
CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL, doc TEXT);
CREATE INDEX item_name ON item (name);
BEGIN;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
INSERT INTO item (name, doc) SELECT 'item-' || i, json_object('i', i, 'sq', i * i) FROM n;
COMMIT;
SELECT count(*), sum(json_extract(doc, '$.sq')) FROM item;
SELECT name FROM item WHERE name LIKE 'item-99%' ORDER BY id;
CREATE VIRTUAL TABLE note USING fts5(body);
INSERT INTO note VALUES ('the sandbox runs sqlite'), ('nothing else matches');
SELECT body FROM note WHERE note MATCH 'sandbox';
SAVEPOINT s; DELETE FROM item; ROLLBACK TO s; RELEASE s;
SELECT count(*) FROM item;
PRAGMA integrity_check;
PRAGMA wal_checkpoint(TRUNCATE);
.mode box
SELECT id, name FROM item LIMIT 3;
.mode list
.dump note
