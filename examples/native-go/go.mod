module example.com/nativego

go 1.19
