module loupe.test/tlsgo

go 1.19
