"""History queries (issue 7): `history.<table>` topics kept in memory, served over HTTP."""
