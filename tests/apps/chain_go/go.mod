module loupe.test/chaingo

go 1.19
