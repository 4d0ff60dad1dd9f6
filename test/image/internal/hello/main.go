// Command hello is the tiny program the image tests run in a container: it
// prints its arguments, its user and the content of the files it is given
// with -cat, so a test sees the entrypoint, cmd, user and files at work.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

func main() {
	cat := flag.String("cat", "", "a file whose first line to print")
	flag.Parse()
	line := ""
	if *cat != "" {
		b, err := os.ReadFile(*cat)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		line, _, _ = strings.Cut(string(b), "\n")
	}
	fmt.Printf("hello %s uid=%d gid=%d cat=%q\n", strings.Join(flag.Args(), " "), os.Getuid(), os.Getgid(), line)
}
