"""The prediction log: one Kafka record per prediction, with a journal and a disk spool so
none is lost."""
