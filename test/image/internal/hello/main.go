// Command hello is the tiny program the image tests run in a container: it
// prints its arguments, its user and the first line of each file it is
// given with -cat, so a test sees the entrypoint, cmd, user and files at work.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

func main() {
	var lines []string
	flag.Func("cat", "a file whose first line to print (repeatable)", func(name string) error {
		b, err := os.ReadFile(name)
		line, _, _ := strings.Cut(string(b), "\n")
		lines = append(lines, line)
		return err
	})
	flag.Parse()
	fmt.Printf("hello %s uid=%d gid=%d cat=%q\n", strings.Join(flag.Args(), " "), os.Getuid(), os.Getgid(), lines)
}
